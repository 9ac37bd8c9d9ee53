"""nettracer.tracers."""
