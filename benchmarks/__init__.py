"""xlsparse benchmarks: one `bench_<family>.py` per op family, run by `xlsparse bench`."""
