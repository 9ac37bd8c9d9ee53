"""nettracer.output."""
