"""Device profiles as data (x86, ARM, CUDA): see issue 10."""
