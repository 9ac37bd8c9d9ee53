"""nettracer.access."""
