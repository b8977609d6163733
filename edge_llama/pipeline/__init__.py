"""Offline pipeline: quantize (modelopt INT4-AWQ), plan (Jetson memory), build (trtllm-build), manifests."""
