"""Peer baselines run beside the mesh: a bare grpc.aio echo and a Mosquitto broker."""
