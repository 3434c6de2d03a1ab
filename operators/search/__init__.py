"""Exact k-nearest-neighbour search (``topk``): scores per streamed chunk of rows, a running top k per query,
bounded memory; the metrics and the vector decoding that table reads share."""
