"""Deciding where to split: the cost model and profile schema, the link estimate, the split policies (cost
model, planner, learned) and the loading of profiles and analyses. Pure functions of explicit snapshots, on
numpy and the runtime alone: the UE runs them without torch."""
