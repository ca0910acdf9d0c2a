"""The base of every error a user's input can cause (a path, a config, a shape, an argument).

Each subclass carries one sentence naming the problem; command-line tools print it as a single line.
It subclasses ValueError so callers that already catch bad values keep working.
"""


class JaxfireError(ValueError):
    pass
