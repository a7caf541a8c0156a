"""Context-7 topics: a keyword table and the classifier that reads a message against it."""

from __future__ import annotations

import re

TOPIC_SCAN_CHARS = 4096

# Keyword clustering: the topic with the most keyword hits wins; ties go to the
# earlier topic in this table; no hit at all is "general".
TOPIC_KEYWORDS: dict[str, frozenset[str]] = {
    "code": frozenset(
        {
            "code",
            "coding",
            "python",
            "javascript",
            "typescript",
            "java",
            "rust",
            "golang",
            "c++",
            "c#",
            "function",
            "functions",
            "bug",
            "bugs",
            "debug",
            "debugging",
            "compile",
            "compiler",
            "script",
            "program",
            "programming",
            "class",
            "variable",
            "api",
            "sql",
            "refactor",
            "exception",
            "traceback",
            "stacktrace",
            "git",
            "regex",
            "algorithm",
            "syntax",
            "django",
            "library",
            "unittest",
            "pytest",
            "json",
            "method",
        }
    ),
    "audio": frozenset(
        {
            "audio",
            "sound",
            "sounds",
            "music",
            "voice",
            "speech",
            "song",
            "songs",
            "mp3",
            "wav",
            "flac",
            "ogg",
            "podcast",
            "microphone",
            "mic",
            "transcribe",
            "transcription",
            "volume",
            "noise",
            "pitch",
            "melody",
            "spectrogram",
        }
    ),
    "browser": frozenset(
        {
            "browser",
            "browse",
            "browsing",
            "website",
            "webpage",
            "web",
            "url",
            "link",
            "links",
            "chrome",
            "chromium",
            "firefox",
            "safari",
            "tab",
            "tabs",
            "click",
            "navigate",
            "scrape",
            "scraping",
            "cookie",
            "cookies",
            "dom",
            "html",
            "css",
            "selenium",
            "playwright",
        }
    ),
    "system": frozenset(
        {
            "system",
            "server",
            "servers",
            "cpu",
            "memory",
            "ram",
            "disk",
            "process",
            "processes",
            "restart",
            "reboot",
            "deploy",
            "deployment",
            "install",
            "linux",
            "windows",
            "docker",
            "kubernetes",
            "network",
            "logs",
            "config",
            "configuration",
            "service",
            "uptime",
            "kernel",
            "shell",
            "terminal",
            "daemon",
        }
    ),
    "chat": frozenset(
        {
            "hello",
            "hi",
            "hey",
            "thanks",
            "thank",
            "chat",
            "talk",
            "joke",
            "conversation",
            "greetings",
            "bye",
            "goodbye",
            "ola",
            "hola",
            "gracias",
        }
    ),
}
_WORD_RE = re.compile(r"[a-z0-9+#]+")
#: word → the topics it counts for, in TOPIC_KEYWORDS order: one dict look per word
#: instead of one set look per word and topic.
_TOPICS_OF: dict[str, tuple[str, ...]] = {}
for _topic, _words in TOPIC_KEYWORDS.items():
    for _word in _words:
        _TOPICS_OF[_word] = (*_TOPICS_OF.get(_word, ()), _topic)


def classify_topic(text: str) -> str:
    """The topic whose keywords the text names most often (the first such in
    TOPIC_KEYWORDS on a tie); ``general`` when it names none."""
    counts: dict[str, int] | None = None
    for word in _WORD_RE.findall(text[:TOPIC_SCAN_CHARS].lower()):
        topics = _TOPICS_OF.get(word)
        if topics is not None:
            if counts is None:
                counts = dict.fromkeys(TOPIC_KEYWORDS, 0)
            for topic in topics:
                counts[topic] += 1
    if counts is None:
        return "general"
    best = max(counts.values())
    return next(topic for topic, count in counts.items() if count == best)
