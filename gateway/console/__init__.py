"""Console: what operators see: admin dashboard, live events, Django views and middleware."""
