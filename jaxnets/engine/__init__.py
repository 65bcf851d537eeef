"""The engine: the train state and step, their jitted programs on a mesh, sharding rules,
feeds, the loop (`fit`) and its hooks, evaluation and serving. It writes no files of its own:
hooks write what they are given."""
