"""Outlier analysis, likelihood, task suites and reports: see issue 6."""
