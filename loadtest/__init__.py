"""Load tests and benchmarks: simulated patients and clinicians, peer baselines, reports."""
