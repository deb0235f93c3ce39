"""WebRTC at the edge: signalling (gRPC and HTTP), relay between patient and clinicians."""
