"""Drift and health monitoring of served models.

stats      running input statistics and predicted-class counts (binned on the training z-grid,
           a reservoir sample), kept by the online server and the stream consumers; JSON, mergeable
reference  the same statistics of the training shards, logged with the training run at registration
live       where live statistics come from: the server's /v1/models/NAME/stats and /metrics, and
           the stream consumers' files
drift      PSI and KS per feature, class-mix PSI, the thresholds and the verdict
report     markdown table, PNG plot, and the health summary parsed from /metrics
check      one monitoring check as the flow's tasks run it (gather, compare and log, retrain spec)
"""
