"""Evaluation: batched generation, judging (the world's oracle, later the score models), metrics with CIs, reports."""
