"""Learning on embeddings, pure torch/numpy (no Ray): task heads (linear probe, MLP) and their safe save
format (``heads``), classification metrics from mergeable confusion matrices and class weights
(``metrics``), and CORAL domain adaptation with streaming moments (``coral``)."""
