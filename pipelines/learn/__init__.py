"""Transfer learning on featx tables and shards: `featx train` (a head on an embeddings table, ``train``),
`featx finetune` (a backbone and a new head end to end on the raw shards, ``finetune``), `featx tune` (a
grid search over head hyperparameters, ``tune``) and `featx predict` (a trained head applied to a table,
``predict``), with the training engine they share (``engine``) and their labels and splits (``labels``)."""
