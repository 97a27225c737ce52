"""Tasks that ship with fdfo: a world to post-train in, its base model, its judge and its prompts."""
