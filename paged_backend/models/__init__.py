"""Model code, the model registry and weight loading."""
