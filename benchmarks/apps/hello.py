# The hello example of the seed "Deploy Compositions of Models", with its imports changed.
# Serve it with:  tandem run hello:language_classifier   (from this folder)
import tandem as serve
from tandem.handle import DeploymentHandle


@serve.deployment
class LanguageClassifer:
    def __init__(self, spanish_responder: DeploymentHandle, french_responder: DeploymentHandle):
        self.spanish_responder = spanish_responder
        self.french_responder = french_responder

    async def __call__(self, http_request):
        request = await http_request.json()
        language, name = request["language"], request["name"]

        if language == "spanish":
            response = self.spanish_responder.say_hello.remote(name)
        elif language == "french":
            response = self.french_responder.say_hello.remote(name)
        else:
            return "Please try again."

        return await response


@serve.deployment
class SpanishResponder:
    def say_hello(self, name: str):
        return f"Hola {name}"


@serve.deployment
class FrenchResponder:
    def say_hello(self, name: str):
        return f"Bonjour {name}"


spanish_responder = SpanishResponder.bind()
french_responder = FrenchResponder.bind()
language_classifier = LanguageClassifer.bind(spanish_responder, french_responder)
