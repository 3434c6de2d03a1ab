"""The CPU preprocess step (``transforms``): images decoded, resized and centre-cropped to the model's input,
texts tokenized to unpadded ids; a record that fails becomes an error row. Free of torch (an import-linter
contract keeps it so); transformers only for tokenizers that have no ``tokenizer.json``."""
