"""The embedding step: the actor and its inner loop, batching and padding (``embedder``), decoding images on
the actor's device (``decode``), and batch-size autotuning (``autotune``)."""
