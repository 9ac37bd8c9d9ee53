"""nettracer.net."""
