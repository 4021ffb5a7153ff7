"""A small built-in prompt set, so a first run needs no data: ``--input sample`` (or no --input).

64 short factual and explanatory questions, as chat messages (a ``messages`` column, which the job renders
with the model's chat template: the demo model, SmolLM2-135M-Instruct, is a chat model).
"""
import pyarrow as pa

QUESTIONS = (
    "What is the capital of France?", "What is the largest planet in the solar system?",
    "Who wrote Romeo and Juliet?", "How many continents are there?",
    "What is the boiling point of water in Celsius?", "Why is the sky blue?", "What is photosynthesis?",
    "How does a rainbow form?", "What is the capital of Japan?", "Who painted the Mona Lisa?",
    "What is the chemical symbol for gold?", "How many legs does a spider have?",
    "What causes the seasons on Earth?", "How fast does light travel?", "What is DNA?",
    "Why do we have day and night?", "What is the capital of Italy?", "What is the tallest mountain in the world?",
    "Who was the first person to walk on the Moon?", "What is the largest ocean on Earth?",
    "How do bees make honey?", "What is gravity?", "What is the difference between weather and climate?",
    "Why do leaves change color in autumn?", "What is the capital of Canada?", "What language is spoken in Brazil?",
    "How many days are in a leap year?", "What is the freezing point of water in Fahrenheit?", "What is a volcano?",
    "How does the heart pump blood?", "What is an atom?", "Why is the ocean salty?",
    "What is the capital of Australia?", "Who discovered penicillin?", "What is the longest river in the world?",
    "Which gas do plants absorb from the air?", "What is a black hole?", "How do airplanes stay in the air?",
    "What is the water cycle?", "Why do cats purr?", "What is the capital of Germany?",
    "How many planets are in the solar system?", "Who invented the telephone?", "What is the smallest prime number?",
    "What is electricity?", "How do vaccines work?", "What is the greenhouse effect?",
    "Why does the Moon change shape?", "What is the capital of Spain?", "What is the hardest natural substance?",
    "Who developed the theory of relativity?", "What is the square root of 64?", "What is a computer program?",
    "How does a compass work?", "What is inflation in economics?", "Why do we need sleep?",
    "What is the capital of Egypt?", "What is the main ingredient in guacamole?",
    "How many bones are in the adult human body?", "What is the largest mammal?", "What is machine learning?",
    "How do fish breathe underwater?", "What causes earthquakes?", "Why do stars twinkle?",
)
MESSAGES = pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))


def sample_prompts(num_rows: int = 64) -> pa.Table:
    """``num_rows`` questions (``id``, ``messages``), deterministic; every 8th row caps ``max_tokens`` at 16
    to show per-row overrides (null elsewhere: the --max-tokens flag applies)."""
    questions = QUESTIONS[:num_rows]
    return pa.table({
        "id": pa.array(range(len(questions)), pa.int64()),
        "messages": pa.array([[{"role": "user", "content": q}] for q in questions], MESSAGES),
        "max_tokens": pa.array([16 if i % 8 == 7 else None for i in range(len(questions))], pa.int64()),
    })
