"""`s3proxy ingest`: every upload prepared automatically, the control plane told.

Its parts: `rules` (which uploads, under which asset name), `events` (S3 event
notifications as SQS delivers them), `sources` (where jobs come from: an SQS queue, or a
polling lister with lease objects), `notify` (signed webhooks, warm-up calls), `service`
(the jobs, their bounds, metrics, logs and the admin listener).
"""
