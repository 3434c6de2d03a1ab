"""Learning on embeddings, pure torch/numpy (no Ray): task heads (linear probe, MLP) and their safe save
format (``heads``), the linear probe solved as a convex problem with a cross-validated L2 penalty
(``convex``), classification metrics from mergeable confusion matrices and class weights (``metrics``),
and CORAL domain adaptation with streaming moments (``coral``)."""
