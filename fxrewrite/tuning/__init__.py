"""Tuning on data: least-squares repair of rewritten sites and knowledge distillation."""
