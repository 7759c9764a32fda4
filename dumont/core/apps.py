from django.apps import AppConfig


class CoreConfig(AppConfig):
    name = "dumont.core"
    label = "core"
