"""Attacks: backdoor triggers with poisoned training, and adversarial examples."""
