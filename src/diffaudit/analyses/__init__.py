from .anomalies import (PAPER_LABELS, detect_anomalies, fetch_paper_labels, load_label_file,  # noqa: E402
                        precision_recall, relative_norms)
from .channels import channel_outliers  # noqa: E402
from .probe import accuracy_at_granularity, run_probe, summarize_probe  # noqa: E402
