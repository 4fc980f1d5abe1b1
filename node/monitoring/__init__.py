"""Watching models in clinical use: what each job's model saw and said (:mod:`.describe`), how
a silent trial's results compare with the live ones (:mod:`.compare`), drift between a reference
window and the recent one (:mod:`.drift`), and readers' rejections that come back from the PACS
as IHE IOCM rejection notes (:mod:`.feedback`). The records live in the index
(:mod:`node.storage.records`); nothing here holds PHI."""
