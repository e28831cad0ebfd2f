"""s3proxy: an authenticating HTTP byte-range proxy from S3 to MistServer."""

__version__ = "0.1.0"
