"""What the tests share: made data and params (common), the servers they start on 127.0.0.1
(httpserver, s3server, raycluster), the GPU imitations (gpu_imitation) and helper scripts."""
