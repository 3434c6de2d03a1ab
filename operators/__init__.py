"""featx operators: readers, preprocessors, embedders, sinks and the model registry.

Every operator is a pure function over Arrow/numpy column batches at its core;
Ray only schedules them (tasks for CPU work, actors that hold a loaded model).
"""
