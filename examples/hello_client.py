# Run while `python3 dev.py serve` (or `tandem run hello:language_classifier`) serves.
import requests

response = requests.post(
    "http://localhost:8000", json={"language": "spanish", "name": "Dora"}
)
greeting = response.text
print(greeting)
