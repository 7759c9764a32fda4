import django_filters

from instances.models import Instance
from instances.states import Status


class InstanceFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=Status.choices)
    # names are unique among live instances only: a destroyed one's name may be reused
    name = django_filters.CharFilter(help_text="Exact name (the command line finds instances by name).")

    class Meta:
        model = Instance
        fields = ["status", "provider", "name"]
