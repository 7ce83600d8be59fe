"""Data: records, readers, image decoding, anomaly synthesis and the demo set."""
