"""Model code, training scripts and small trained weights with model cards."""
