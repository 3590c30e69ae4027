"""Audit harness of Medical Aegis: detector baselines (KD, LID, MAHA, DNN), detection statistics with bootstrap
intervals, sanity flags, the paper's Tables 1-5 at a recorded scale, and the bundle's security report.

Entry point: `python -m training.audit {table1,...,table5,report} --bundle DIR --scale cpu` (see `__main__.py` and
docs/audit.md). Attacks come through one adapter, `training.audit.attacks.make_attack`.
"""
