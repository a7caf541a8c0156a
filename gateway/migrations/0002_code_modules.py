"""One Module row per code-default module, so the admin lists every module from the start.

The rows carry no URL (they inherit the env override or the code default) and no breaker
settings; operators fill in what they want to change.
"""

from django.db import migrations

CODE_MODULES = ["madre", "switch", "hermes", "hormiguero", "manifestator", "mcp", "shub",
                "spawner", "operator"]


def create(apps, schema_editor):
    Module = apps.get_model("gateway", "Module")
    for name in CODE_MODULES:
        Module.objects.get_or_create(name=name, defaults={"url": "", "health_path": "/health"})


def remove(apps, schema_editor):
    Module = apps.get_model("gateway", "Module")
    Module.objects.filter(name__in=CODE_MODULES, url="").delete()


class Migration(migrations.Migration):
    dependencies = [("gateway", "0001_initial")]
    operations = [migrations.RunPython(create, remove)]
