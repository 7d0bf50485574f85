"""Pipeline sharding: a model split by layers into stages, in one process or across machines on Ray.

plan.py decides the split (bounds balanced by bytes), stages.py runs stages in this process, ray_stages.py runs
each stage in a Ray actor. docs/sharding.md is the user's guide.
"""
