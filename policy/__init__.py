"""Policies that choose refill rates: the learned one, classical baselines and the safety engine."""
