"""OpenCV analytics on sampled patient frames: picture quality hints and pulse by rPPG."""
