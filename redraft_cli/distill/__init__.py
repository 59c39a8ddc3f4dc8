"""Drafter distillation: self-distillation data generation (`data`)."""
