"""deepclick."""
