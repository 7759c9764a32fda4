import django_filters

from instances.models import Instance
from instances.states import Status


class InstanceFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=Status.choices)

    class Meta:
        model = Instance
        fields = ["status", "provider"]
