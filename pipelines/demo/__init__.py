"""`featx demo` (``demo``) and the small real datasets it, the tests and the benchmarks generate with no
network (``sample_data``)."""
