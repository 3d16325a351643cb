from app.config import PUNCTUATION


def greet(name: str) -> str:
    # TODO: greet politely, with a comma after Hello
    return f"Hello {name}{PUNCTUATION}"


def farewell(name: str) -> str:
    return f"Goodbye {name}{PUNCTUATION}"
