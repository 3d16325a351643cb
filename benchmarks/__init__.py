"""codelane's benchmarks: each prints its figures; ratios are measured side by side in one run."""
