"""Models: the one registry of model names (``registry``), the spec types it resolves to (``specs``, free of
torch), the loaders of each model family (``loaders``), where the packaged weights live (``packaged``), the
loaded backbone and its shared machinery (``backbones``), and the inference-only speed-ups: batch norms folded
into convolutions (``fold``) and a lean BERT encoder (``bert``)."""
