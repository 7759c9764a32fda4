from django.urls import path

from dumont.core.routers import Router
from instances.api import views

router = Router()
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("snapshots", views.SnapshotViewSet, basename="snapshot")

urlpatterns = [
    path("metrics", views.MetricsView.as_view(), name="metrics"),
    path("metrics/savings/real", views.SavingsView.as_view(), name="savings"),
    path("standby", views.StandbyConfigView.as_view(), name="standby"),
    path("standby/status", views.StandbyStatusView.as_view(), name="standby-status"),
    *router.urls,
]
