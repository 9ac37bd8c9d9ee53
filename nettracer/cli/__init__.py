"""nettracer.cli."""
