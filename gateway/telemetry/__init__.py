"""What the gateway says about itself: Prometheus metrics (`metrics`) and OpenTelemetry traces (`tracing`)."""
